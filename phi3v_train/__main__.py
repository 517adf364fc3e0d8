from phi3v_train.cli import main

main()
